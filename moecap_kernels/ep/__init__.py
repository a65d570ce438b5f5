"""Expert parallelism (MoE-CAP's PA class): experts placed on ranks of torch.distributed, the exact
traffic between ranks, time by phase, and the projection of that traffic onto links we do not have.

- ``placement``: which rank holds which expert (contiguous, or any map with redundant copies);
- ``traffic``: the exact N×N matrix of routed pairs from each source rank to each expert's rank;
- ``layer``: one rank's forward (router → dispatch → experts → combine) with all_to_all_single;
- ``run``: the timed, counted profile of every rank, gathered into one row on rank 0;
- ``launch``: the process group (gloo on CPU, NCCL on CUDA) and the self-launch of N local ranks;
- ``project``: dispatch/combine time past one machine from the exact traffic and a link's figures.
"""

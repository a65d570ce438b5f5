from moecap_kernels.profile import main

raise SystemExit(main())

"""Quantized experts: weight formats (``formats``), the torch quantizer and dequantizer
(``quantize``), and a layer's experts put into a format (``layer``)."""

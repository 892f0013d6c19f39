"""The command-line tools behind ``python -m molt_kernels``: verify, bench, gpu-report, flops,
convert, train and study. Tools may import everything below them; nothing in the package imports the
tools."""

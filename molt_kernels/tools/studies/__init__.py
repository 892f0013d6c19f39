"""Studies behind ``python -m molt_kernels study <name>``: each module trains and evaluates
replacement layers on a model and writes its report (JSON + plots) to a directory."""

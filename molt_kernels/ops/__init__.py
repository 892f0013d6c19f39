"""The fused ops and their kernels, one folder per op: ``reference.py`` (naive), ``pytorch.py``
(the sparse PyTorch path), ``kernels.py`` + ``launch.py`` (Triton) and the op's autograd in
``autograd.py``; ``builds.py`` lists the kernel builds for the gpu-report. Shared here: launch
configs (``configs.py``), dtype rules (``dtypes.py``), argument checks (``validation.py``) and the
kernel registry (``registry.py``). Nothing in ``ops`` imports from the rest of the package."""

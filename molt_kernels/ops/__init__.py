"""One subpackage per fused op: ``reference.py`` (naive), ``torch.py`` (sparse PyTorch),
``triton.py`` (kernels and launch code), with the op's autograd in the subpackage itself."""

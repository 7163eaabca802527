"""Op families. Each package holds one family: its public function (validation + dispatch), its
pure-PyTorch reference, and the kernels of each backend, side by side."""

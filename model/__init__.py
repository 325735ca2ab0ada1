"""The "No Time to Train" method (SAM2 proposals + DINOv2 prototypes) in plain PyTorch."""

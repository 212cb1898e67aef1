"""New nn.Modules (LaMamba blocks, ROI adapter)."""

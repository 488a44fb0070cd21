"""Image input and result export."""

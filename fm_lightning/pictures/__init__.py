"""Pictures the callback and the command lines draw: pure tensor -> (H, W, 3) uint8 functions."""

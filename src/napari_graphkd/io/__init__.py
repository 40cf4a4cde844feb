"""Reading and writing: checkpoints, image folders."""

"""The draft and its training maths: config (`config`), layers, the draft (`draft`), COD sampling (`cod`),
the COD mask (`mask`) and its tiled kernel (`tiled_attention`), the KL loss (`loss`) and one training
step (`step`: `PEagleTrainer`)."""

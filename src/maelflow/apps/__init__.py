"""The MAELSTROM applications AP1-AP6 as small Lightning applications on seeded synthetic data.

Each application is two modules: ``apN_data`` writes its dataset (``generate(path, seed=..., ...)``,
numpy and zarr only, named by a dataset config's ``generator``) and ``apN`` holds its
LightningDataModule and LightningModule (named by a training config's ``datamodule`` and
``application``). Every application logs ``skill_vs_baseline`` against a simple baseline on its
held-out data. What each one is, its real data and how to scale it: docs/applications.md.

=====  ==================================  ====================================  ======================
app    what (MAELSTROM partner)             model                                 baseline
=====  ==================================  ====================================  ======================
AP1    NWP 2 m temperature post-processing  quantile U-Net                        raw NWP
AP2    rain from short messages             small Transformer classifier          climatological rate
AP3    radiative heating rates (ecRad)      BiLSTM over the levels                linear regression
AP4    ensemble post-processing (ENS-10)    U-Net trained on the CRPS             raw ensemble
AP5    2 m temperature downscaling          U-Net with orography                  bilinear interpolation
AP6    wind and solar power from regimes    tiny CNN embedding + power head       climatology
=====  ==================================  ====================================  ======================
"""

"""LightningModules: DetectorModule (test and fit), GeneratorModule (predict)."""

"""Statistics of models on data (Fisher, Gram) for data-dependent merging: ``alloykit stats``."""

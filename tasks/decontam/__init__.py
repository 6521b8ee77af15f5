"""Pool stages that mark examples to leave out of selection: test-set decontamination and
near-duplicate removal."""

"""Local mirrors of standard lmms-eval benchmarks' formats (MME, POPE, ScienceQA, MMMU, MUIRBench)."""

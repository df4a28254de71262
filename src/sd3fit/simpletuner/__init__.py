"""The only part of sd3fit that imports SimpleTuner: the launcher, the version gate, the patches, the option dump.

Everything outside this package works without SimpleTuner installed.
"""

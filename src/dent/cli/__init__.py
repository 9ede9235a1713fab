"""The ``dent`` command line: ``dent <command> --cfg cfgs/X.yaml KEY VALUE ...``."""

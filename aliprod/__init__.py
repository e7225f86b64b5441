__version__ = "0.1.0"

def __getattr__(name:str):
    # `aliprod.open_run` / `aliprod.compare` without importing torch and pandas at `import aliprod`: loaded on first use
    if name in ('open_run', 'compare'):
        from . import explore
        return getattr(explore, name)
    raise AttributeError(f"module 'aliprod' has no attribute {name!r}")

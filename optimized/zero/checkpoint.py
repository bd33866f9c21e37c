def consolidate(path): raise NotImplementedError

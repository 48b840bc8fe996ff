"""placeholder"""
class BpfObject:  # replaced below
    pass

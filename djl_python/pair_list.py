from handlers.pair_list import PairList

__all__ = ["PairList"]

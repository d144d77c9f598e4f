"""Import name `djl_python`, so an LMI model.py runs unchanged. Everything here is a re-export of
`handlers`: the same classes, not copies, so isinstance checks agree."""

from handlers.inputs import Input
from handlers.outputs import Output
from handlers.pair_list import PairList
from handlers.sessions import SessionManager

__all__ = ["Input", "Output", "PairList", "SessionManager"]

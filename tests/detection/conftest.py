"""One intra-op thread for every test of this folder (see ``one_torch_thread``)."""

from tests.implicit.helpers import one_torch_thread  # noqa: F401

"""Import presidio without the Hugging Face half the scanner never uses.

``presidio_analyzer``'s package ``__init__`` imports its transformers NLP engine, whose module runs
``from transformers import pipeline``: transformers' whole pipeline stack, about 2.5 s of a cold
``appliance scan`` here, for an engine the appliance does not use (it runs spaCy's small English
model). While presidio is first imported, ``transformers`` is marked missing, so that import takes
presidio's own ``ImportError`` fallback; the mark is removed at once, and anything that needs
transformers later (training, serving) imports it as usual. In a process that already imported
transformers, nothing changes.

Import this module before ``presidio_analyzer`` in every module of the scanner that uses it.
"""

from __future__ import annotations

import sys

if "presidio_analyzer" not in sys.modules and "transformers" not in sys.modules:
    sys.modules["transformers"] = None  # type: ignore[assignment]  # import of it raises ImportError
    try:
        import presidio_analyzer  # noqa: F401
    finally:
        if sys.modules.get("transformers", 0) is None:
            del sys.modules["transformers"]

"""tsg: train and fine-tune small causal language models on short stories, and tell stories with them."""

import logging

__version__ = "0.1.0"

# bitsandbytes, on import on CPUs with AVX512-BF16, tries to fetch an optional kernel from the hub through
# `kernels` (a transformers requirement since 5.25), which warns that it skips its trust check offline, and
# bitsandbytes warns when the fetch fails; its own CPU kernels are used instead, so both warnings only alarm.
for _name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    logging.getLogger(_name).addFilter(lambda record: "kernels-community" not in record.getMessage())

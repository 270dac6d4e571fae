"""tsg: train and fine-tune small causal language models on short stories, and tell stories with them."""

import logging

__version__ = "0.1.0"

# bitsandbytes warns on import, on CPUs with AVX512-BF16, that it cannot fetch an optional kernel from
# the hub; its own CPU kernels are used instead, so the warning only alarms.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "kernels-community" not in record.getMessage())

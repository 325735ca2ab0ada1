"""Label Studio regions <-> masks: label config, annotations, results, brush RLE, prompts."""

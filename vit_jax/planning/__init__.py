"""Planning a TPU run without a TPU: the TPU generations, the compile check (`aot`) and the
search for the fastest setting that fits (`aot_search`)."""

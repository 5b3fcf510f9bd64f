"""The machine a run is on: files local and on gs://, and how JAX and TensorFlow are set up."""

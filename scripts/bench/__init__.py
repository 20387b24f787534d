"""The inference benchmark of scripts/bench.sh: medbox through its gRPC
service against Hugging Face transformers, on the same model and machine."""

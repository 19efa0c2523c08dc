"""WebVid ingestion and latent shard tooling, each stage usable alone.

    webvid   CSV rows -> filtered list of videos (with resolved URLs)
    decode   video -> fixed-size clip (PyAV), or SkipVideo with a reason
    encode   clips/captions -> latents/text states (latent codec, CLIP text encoder)
    write    rows -> shard plan -> committed shards + index.json + errors.jsonl
    shards   the shard contract (writer, index, reader)
    check    validate a dataset, describe samples, decode one to a GIF
    synth    deterministic synthetic WebVid-format dataset of moving shapes
    models   random-weight diffusers-format model dirs (tests, benchmarks)
    metrics  Prometheus counters of the preprocessing job
    cli      the `data_tools` command (synth, inspect, validate)

The distributed job that strings them together is pipelines/preprocess.py.
"""

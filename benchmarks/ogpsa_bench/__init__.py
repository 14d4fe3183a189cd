"""The OGPSA overhead benchmark (benchmarks/README.md), one job per module; imports point down:

    cli         command line, defaults, the process's settings           (python benchmarks/run.py)
    loop        the runs: configs, one instrumented run, the repeat/size/stage/method loop
    instrument  the timing: a proxy of the constraint interface, a trainer callback
    copycheck   host/device copies of one projection call (torch.profiler)
    assets      tokenizer, data and random-initialised models, built offline
    summary     rows, ratios against the plain stage, verdicts, bench.json / bench.md
    device      synchronisation, memory counters, device name and versions
"""

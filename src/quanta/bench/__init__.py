"""Benchmarks (not tests): latency, throughput, roofline and a transformers peer, printing tables + JSON."""

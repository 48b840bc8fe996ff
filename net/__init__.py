"""Socket filters: classic BPF (decoder, checker, conversion to eBPF, a
direct interpreter), the sk_buff model and the flow dissector behind
SKF_AD_PAY_OFFSET, pcap reading, and the ``emu filter`` command.

Built on the BPF machine (``probes.bpf``); nothing here imports the probe
core. See net/README.md.
"""

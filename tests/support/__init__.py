"""What the tests share: BAM builders and the samtools oracle, the one fake samtools, the daemon
harness and the polling wait.  The DNAnexus emulator is devtools/dnanexus_emulator.py."""

"""Development tools shared by the tests and the benchmarks (not part of the bamcountd package):
the DNAnexus emulator and a dx-watch runner set up against it."""

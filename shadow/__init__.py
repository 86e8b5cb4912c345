"""Shadow traffic: sampling, mirroring to the teacher, pairing, scoring, the pair store, export."""

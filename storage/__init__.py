"""Everything that touches a URI: filesystems, shards, synth, checkpoints, retries."""

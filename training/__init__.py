"""rolebot's training side: screenplays to datasets, the SFT core, evaluation, adapters."""

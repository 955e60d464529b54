"""Coverage-guided fuzzing (atheris) of everything that parses hostile input.

See ``fuzz/README.md``; ``python3 -m fuzz.run --seconds 60`` runs every target.
"""

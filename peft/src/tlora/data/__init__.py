"""Application support: reading rows of local files and hub datasets (`rows`), the Alpaca prompt (`prompts`), and
the packaged sample data files (`sample_*.json[l]`, read as `tlora/data/<name>`). Imports no other tlora module;
training and evaluation both read their data through it.
"""

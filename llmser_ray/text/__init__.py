"""Item text as vectors (the ``embed`` stage) and the FAISS actors that search them."""

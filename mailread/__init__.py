"""How mail is read: bytes in, a result out; nothing here imports the broker or the database.

- ``parse``: the one boundary around parsing a message (flanker for MIME, with ``repair``
  showing it a tidied copy of broken mail, ``charsets`` decoding every text, ``legacy`` the
  pre-MIME encodings, ``quiet_flanker`` keeping flanker's logging and errors in bounds);
- ``understand``: the four answers a help desk needs — ``reply`` (what the person wrote),
  ``automatic`` (auto-replies, bulk, loops), ``bounce`` (delivery reports and complaints),
  ``thread`` (the keys of a conversation; the lookup of stored parents is the save path's).
"""

"""Local stand-ins for Seam, Twilio and SMTP: the vendors' APIs on real sockets, failures included."""

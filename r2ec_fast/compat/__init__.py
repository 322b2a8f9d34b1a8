"""Drop-in backend for the reference RecPO trainer."""

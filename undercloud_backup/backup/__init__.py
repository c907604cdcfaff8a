"""One backup run: the request, its stages and the procedure that joins them."""

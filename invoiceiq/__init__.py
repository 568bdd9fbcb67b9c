"""InvoiceIQ: WhatsApp-first invoicing paid by M-PESA STK Push."""

__version__ = "0.1.0"

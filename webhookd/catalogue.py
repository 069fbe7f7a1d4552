"""The events of the product's webhook documentation, with its example payloads."""

from __future__ import annotations

from typing import Any

# The seed documentation's seven events: (type, description, example timestamp, example data).
# The examples are verbatim, including the no-break space in "[email\u00a0protected]".
SEED_EVENTS: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    (
        "booking.created",
        "Triggered when a new booking is created",
        "2024-01-15T10:00:00Z",
        {
            "id": "book_123",
            "experienceId": "exp_456",
            "experienceName": "City Walking Tour",
            "customerName": "John Doe",
            "customerEmail": "[email\u00a0protected]",
            "startTime": "2024-02-15T14:00:00Z",
            "participants": 2,
            "status": "CONFIRMED",
            "totalAmount": 9000,
            "currency": "USD",
        },
    ),
    (
        "booking.confirmed",
        "Triggered when a pending booking is confirmed",
        "2024-01-15T10:05:00Z",
        {"id": "book_123", "status": "CONFIRMED", "confirmedAt": "2024-01-15T10:05:00Z"},
    ),
    (
        "booking.cancelled",
        "Triggered when a booking is cancelled",
        "2024-01-15T10:10:00Z",
        {
            "id": "book_123",
            "status": "CANCELLED",
            "cancelledAt": "2024-01-15T10:10:00Z",
            "reason": "Customer request",
            "refundAmount": 9000,
            "refundStatus": "PENDING",
        },
    ),
    (
        "booking.updated",
        "Triggered when booking details are modified",
        "2024-01-15T10:15:00Z",
        {
            "id": "book_123",
            "changes": {
                "participants": {"old": 2, "new": 3},
                "totalAmount": {"old": 9000, "new": 13500},
            },
        },
    ),
    (
        "payment.succeeded",
        "Triggered when a payment is successfully processed",
        "2024-01-15T10:20:00Z",
        {
            "id": "pay_789",
            "bookingId": "book_123",
            "amount": 9000,
            "currency": "USD",
            "method": "card",
            "status": "SUCCEEDED",
        },
    ),
    (
        "payment.failed",
        "Triggered when a payment fails",
        "2024-01-15T10:25:00Z",
        {
            "id": "pay_789",
            "bookingId": "book_123",
            "amount": 9000,
            "currency": "USD",
            "status": "FAILED",
            "errorCode": "CARD_DECLINED",
            "errorMessage": "The card was declined",
        },
    ),
    (
        "customer.created",
        "Triggered when a new customer is created",
        "2024-01-15T10:30:00Z",
        {
            "id": "cust_321",
            "name": "Jane Smith",
            "email": "[email\u00a0protected]",
            "phone": "+1234567890",
            "createdAt": "2024-01-15T10:30:00Z",
        },
    ),
)

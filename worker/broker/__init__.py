"""RabbitMQ: topology, plugin-free delays, and the consumer that acks, retries or dead-letters."""

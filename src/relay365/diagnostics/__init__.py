"""The admin's setup tools: reply-code catalogue, explain, SPF, advisor, doctor."""

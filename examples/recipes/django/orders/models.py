from django.db import models


class Order(models.Model):
    sku = models.CharField(max_length=40)
    quantity = models.PositiveIntegerField()
    created = models.DateTimeField(auto_now_add=True)
